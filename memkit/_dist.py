"""The distribution name on PyPI (``memkit`` there is an unrelated project); the import package is ``memkit``."""

DISTRIBUTION = "videossm-memkit"


def install_hint(extra: str) -> str:
    """The pip command that installs an optional extra of this distribution."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"
