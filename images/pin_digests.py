#!/usr/bin/env python3
"""Re-resolve the digests of the images' base images and write them into the Dockerfiles.

Every base image in ``images/*/Dockerfile`` is written ``NAME:TAG@sha256:DIGEST`` (in a ``FROM``
line or in the default of an ``ARG`` that a ``FROM`` uses). The tag is for people; the digest is
what is pulled. This script asks the registry for the digest that each ``NAME:TAG`` has *now*
(the multi-platform index, so every architecture stays buildable) and rewrites the files:

    python images/pin_digests.py            # rewrite the digests in place
    python images/pin_digests.py --check    # exit 1 if any pinned digest is not the current one

It needs network access to the registry and one of ``crane``, ``skopeo`` or ``docker buildx``
(the first found is used). Run it when bumping a base tag, and before a release, so that the
image picks up the base's security updates; then rebuild and commit the Dockerfiles.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

IMAGES_DIR = Path(__file__).resolve().parent

# NAME:TAG with an optional @sha256:DIGEST, where it names a base image: right after FROM
# (optionally preceded by --platform=...), or as the default value of an ARG.
_REF = r"(?P<ref>[a-z0-9][a-z0-9._/:-]*:[A-Za-z0-9._-]+)(?:@sha256:(?P<digest>[0-9a-f]{64}))?"
_LINE = re.compile(
    r"^(?P<head>\s*(?:FROM\s+(?:--platform=\S+\s+)?|ARG\s+[A-Za-z_][A-Za-z0-9_]*=))" + _REF + r"(?P<tail>(?:\s|$).*)$",
    re.IGNORECASE | re.MULTILINE,
)


def dockerfiles() -> list[Path]:
    return sorted(IMAGES_DIR.glob("*/Dockerfile"))


def pinned_refs(text: str) -> list[tuple[str, str | None]]:
    """The (NAME:TAG, digest or None) of every base-image reference in a Dockerfile's text."""
    return [(m["ref"], m["digest"]) for m in _LINE.finditer(text)]


def rewrite(text: str, resolve: Callable[[str], str]) -> str:
    """``text`` with every base-image reference pinned to ``resolve(NAME:TAG)`` (``sha256:...``)."""

    def sub(m: re.Match[str]) -> str:
        digest = resolve(m["ref"])
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise ValueError(f"{m['ref']}: resolver returned {digest!r}, not a sha256 digest")
        return f"{m['head']}{m['ref']}@{digest}{m['tail']}"

    return _LINE.sub(sub, text)


def registry_resolver() -> Callable[[str], str]:
    """A function NAME:TAG -> current index digest, using the first tool found on PATH."""
    if shutil.which("crane"):
        return lambda ref: _run(["crane", "digest", ref]).decode().strip()
    if shutil.which("skopeo"):
        return lambda ref: _sha256(_run(["skopeo", "inspect", "--raw", f"docker://{ref}"]))
    if shutil.which("docker") and subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode == 0:
        return lambda ref: _sha256(_run(["docker", "buildx", "imagetools", "inspect", "--raw", ref]))
    sys.exit("error: none of crane, skopeo or docker buildx is on PATH; install one of them")


def _run(cmd: list[str]) -> bytes:
    return subprocess.run(cmd, check=True, capture_output=True).stdout


def _sha256(raw_manifest: bytes) -> str:
    # The digest of a manifest (or index) is the sha256 of its bytes exactly as served.
    return "sha256:" + hashlib.sha256(raw_manifest).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report; exit 1 if a digest is out of date")
    args = parser.parse_args(argv)
    lookup = registry_resolver()
    cache: dict[str, str] = {}

    def resolve(ref: str) -> str:
        if ref not in cache:
            cache[ref] = lookup(ref)
        return cache[ref]

    stale = 0
    for path in dockerfiles():
        text = path.read_text()
        for ref, digest in pinned_refs(text):
            current = resolve(ref)
            ok = digest is not None and f"sha256:{digest}" == current
            stale += not ok
            print(f"{path.relative_to(IMAGES_DIR.parent)}: {ref} {'ok' if ok else 'now'} {current}")
        if not args.check:
            new = rewrite(text, resolve)
            if new != text:
                path.write_text(new)
    if args.check and stale:
        print(f"{stale} base image reference(s) not pinned to the current digest; run images/pin_digests.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
