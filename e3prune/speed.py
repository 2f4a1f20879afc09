"""Prefill and decode throughput of causal LMs, timed the same way wherever it is measured
(docs/method.md, Stage 6): by the evaluate step and by ``benchmarks/speed.py``.

- Prefill: one forward over a batch without a KV cache.
- Decode: a greedy ``generate`` of ``new_tokens + 1`` tokens with the KV cache minus one of a
  single token, so the prompt's prefill is subtracted.
- The models take turns (first, second, ..., first, second, ...) so that drifts of a shared
  machine hit all alike; each model and phase reports the median of the repeats and their
  min / max (the spread).
- On CUDA the device is synchronised before and after every timed region: kernels run
  asynchronously, and without a sync the clock stops before the work is done.
- A measurement is checked before it is believed (:func:`speed_problems`). Removing decoder
  layers cannot make a model faster than the share of layers removed allows: with L layers in the
  baseline and k in the model, a speedup above B = L/k × (1 + ``bound_margin``), or below 1/B, is
  contention, not the model (the layer counts come from the models' configs). Neither is a
  relative spread of the repeats, (max − min) / median, above ``max_relative_spread``. A
  suspect measurement is taken once more with ``remeasure_factor`` times the repeats; if that is
  suspect too, it is reported with ``reliable: false`` and the reason, and the promotion gate
  does not promote on it (docs/operations.md, "Promotion and rollback").
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

PHASES = ("prefill", "decode")
Times = dict[str, dict[str, list[float]]]  # {model: {phase: [seconds per repeat]}}


@dataclass(frozen=True)
class SpeedSettings:
    """What one speed measurement times; the defaults are those of the evaluate step."""

    repeats: int = 5  # interleaved timed runs per model
    prefill_batch: int = 8  # sequences in the timed prefill
    prefill_len: int = 256  # tokens per sequence in the timed prefill
    decode_batch: int = 4  # sequences decoded at once
    decode_prompt: int = 32  # prompt tokens before the timed decode
    decode_tokens: int = 64  # greedy tokens generated with the KV cache
    seed: int = 0  # seed of the random token ids
    bound_margin: float = 0.15  # a speedup beyond L/k × (1 + margin), or below its inverse, is not believed
    max_relative_spread: float = 0.5  # (max − min) / median of a model's repeats above this is not believed
    remeasure_factor: int = 2  # a suspect measurement is taken once more with this many times the repeats


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA only; a CPU forward returns when it is done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill_seconds(model: torch.nn.Module, batch: torch.Tensor) -> float:
    """Seconds of one forward over ``batch`` without a KV cache."""
    with torch.no_grad():
        sync(batch.device)
        t = time.perf_counter()
        model(input_ids=batch, use_cache=False)
        sync(batch.device)
        return time.perf_counter() - t


def decode_seconds(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, pad_token_id: int) -> float:
    """Seconds of ``new_tokens`` greedy steps with the KV cache, the prompt's prefill subtracted.

    Generating 1 token costs the prefill (and one sampling step); generating ``new_tokens + 1``
    costs the prefill and ``new_tokens`` decode steps more. The difference is the decode.
    """
    mask = torch.ones_like(prompt)
    kwargs = {"attention_mask": mask, "do_sample": False, "pad_token_id": pad_token_id}
    with torch.no_grad():
        sync(prompt.device)
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kwargs)
        sync(prompt.device)
        t_first = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, **kwargs)
        sync(prompt.device)
        return time.perf_counter() - t - t_first


def timed_runs(models: Mapping[str, torch.nn.Module], settings: SpeedSettings, pad_token_id: int) -> Times:
    """``{name: {phase: [seconds per repeat]}}``, the models interleaved run by run after a warm-up.

    Random token ids (seeded by ``settings.seed``): the time of a dense forward does not depend
    on their values. The inputs live on the device of the first model's parameters.
    """
    first = next(iter(models.values()))
    device = next(first.parameters()).device
    vocab = first.config.vocab_size
    s = settings
    gen = torch.Generator().manual_seed(s.seed)
    prefill = torch.randint(0, vocab, (s.prefill_batch, s.prefill_len), generator=gen).to(device)
    prompt = torch.randint(0, vocab, (s.decode_batch, s.decode_prompt), generator=gen).to(device)
    for m in models.values():  # warm-up: allocator, kernels, lazy initialisation
        prefill_seconds(m, prefill[:2])
        decode_seconds(m, prompt, min(4, s.decode_tokens), pad_token_id)
    times: dict[str, dict[str, list[float]]] = {name: {p: [] for p in PHASES} for name in models}
    for _ in tqdm(range(s.repeats), desc="speed (interleaved)", unit="round"):
        for name, m in models.items():
            times[name]["prefill"].append(prefill_seconds(m, prefill))
            times[name]["decode"].append(decode_seconds(m, prompt, s.decode_tokens, pad_token_id))
    return times


def _model_speed(times: Mapping[str, list[float]], tokens: Mapping[str, int]) -> dict[str, float]:
    """Medians as tokens/s and seconds, and the spread of the repeats' seconds (min, max)."""
    out: dict[str, float] = {}
    for phase in PHASES:
        out[f"{phase}_tokens_per_second"] = tokens[phase] / statistics.median(times[phase])
    for phase in PHASES:
        out[f"{phase}_seconds"] = statistics.median(times[phase])
        out[f"{phase}_seconds_min"] = min(times[phase])
        out[f"{phase}_seconds_max"] = max(times[phase])
    return out


def relative_spread(seconds: Sequence[float]) -> float | None:
    """(max − min) / median of the repeats; None when the median is not positive (a decode time is
    a difference of two times and can be, on a busy machine)."""
    median = statistics.median(seconds)
    return (max(seconds) - min(seconds)) / median if median > 0 else None


def speedups(times: Mapping[str, Mapping[str, Sequence[float]]]) -> dict[str, dict[str, float]]:
    """``{model: {phase: baseline median / model median}}`` for every model but the first (the baseline)."""
    base, *others = times
    med = {name: {p: statistics.median(times[name][p]) for p in PHASES} for name in times}
    return {name: {p: med[base][p] / med[name][p] for p in PHASES} for name in others}


def speed_problems(
    times: Mapping[str, Mapping[str, Sequence[float]]], layers: Mapping[str, int | None], settings: SpeedSettings
) -> list[str]:
    """Why the measurement ``times`` cannot be believed (empty when it can): a speedup outside
    [1/B, B] with B = L/k × (1 + margin) (L, k: decoder layers of the baseline and the model; not
    checked when a count is unknown), or a relative spread above ``settings.max_relative_spread``."""
    problems = []
    base = next(iter(times))
    for name, phases in speedups(times).items():
        if not (layers.get(base) and layers.get(name)):
            continue
        bound = layers[base] / layers[name] * (1 + settings.bound_margin)
        for phase, value in phases.items():
            if not 1 / bound <= value <= bound:
                problems.append(
                    f"{name} {phase} speedup {value:.2f}× is outside the physical bound [{1 / bound:.2f}, "
                    f"{bound:.2f}]× of {layers[base]} → {layers[name]} layers (margin {settings.bound_margin:g})"
                )
    for name, phases in times.items():
        for phase, seconds in phases.items():
            spread = relative_spread(seconds)
            if spread is None or spread > settings.max_relative_spread:
                shown = "undefined (median time not positive)" if spread is None else f"{spread:.2f}"
                problems.append(
                    f"{name} {phase} relative spread {shown} of {len(seconds)} repeats "
                    f"exceeds {settings.max_relative_spread:g}"
                )
    return problems


def measure_speed(
    models: Mapping[str, torch.nn.Module],
    settings: SpeedSettings,
    pad_token_id: int,
    timing: Callable[[Mapping[str, torch.nn.Module], SpeedSettings, int], Times] = timed_runs,
) -> dict[str, Any]:
    """Prefill and decode throughput of ``models``, interleaved run by run; the first is the baseline.

    ``models[name]`` holds the medians (``prefill_tokens_per_second``, ``prefill_seconds``, the
    same for decode) and the spread of the repeats (``prefill_seconds_min`` / ``_max``, the same
    for decode); ``speedup[name]`` is the baseline's median time over the model's, per phase;
    ``relative_spread[name][phase]`` is (max − min) / median. A suspect measurement
    (:func:`speed_problems`) is taken once more with more repeats (``remeasured``); ``reliable``
    says whether the reported one passed, ``unreliable_reason`` why not. ``timing`` takes the
    times (:func:`timed_runs`; a test gives fake ones).
    """
    layers = {name: getattr(getattr(m, "config", None), "num_hidden_layers", None) for name, m in models.items()}
    times = timing(models, settings, pad_token_id)
    problems = speed_problems(times, layers, settings)
    remeasured = bool(problems)
    if remeasured:
        settings = replace(settings, repeats=settings.repeats * settings.remeasure_factor)
        log.warning("speed not believed (%s); measuring again, %d repeats", "; ".join(problems), settings.repeats)
        times = timing(models, settings, pad_token_id)
        problems = speed_problems(times, layers, settings)
        if problems:
            log.warning("speed measurement unreliable: %s", "; ".join(problems))
    reliability = {"remeasured": remeasured, "reliable": not problems, "unreliable_reason": "; ".join(problems) or None}
    return {**_report(models, settings, times), **reliability}


def _report(models: Mapping[str, torch.nn.Module], settings: SpeedSettings, times: Times) -> dict[str, Any]:
    """The measurement as ``metrics.json`` holds it: settings, per-model medians and spread, speedups."""
    s = settings
    tokens = {"prefill": s.prefill_batch * s.prefill_len, "decode": s.decode_batch * s.decode_tokens}
    first = next(iter(models.values()))
    return {
        "device": device_name(next(first.parameters()).device),
        "dtype": str(next(first.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "repeats": s.repeats,
        "prefill": {"batch": s.prefill_batch, "length": s.prefill_len},
        "decode": {"batch": s.decode_batch, "prompt": s.decode_prompt, "new_tokens": s.decode_tokens},
        "models": {name: _model_speed(t, tokens) for name, t in times.items()},
        "speedup": speedups(times),
        "relative_spread": {name: {p: relative_spread(t[p]) for p in PHASES} for name, t in times.items()},
    }


def device_name(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H200)`` on a GPU, else the device as torch names it."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
