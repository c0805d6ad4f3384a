"""maisi: NVIDIA MAISI (3D latent diffusion for CT with segmentation masks) as a command line and a Python library.

    from maisi_cli import Generator

    samples = Generator(model="demo").generate(num_samples=2, seed=7)

See docs/python-api.md. The API is imported on first use, so `maisi --help` and shell completion stay quick.
"""

from maisi_cli._version import __version__

_API = ("Generator", "Sample", "MaisiWarning", "MaisiError", "qc", "preview", "fid", "model_statistics_file")


def __getattr__(name: str):
    if name in _API:
        from maisi_cli import api  # torch and MONAI: only when the library is used

        return getattr(api, name)
    raise AttributeError(f"module 'maisi_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["__version__", *_API]
