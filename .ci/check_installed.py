"""Run with the python of an installed maisi (e.g. the pipx venv's): the package holds every data file of the
source tree's maisi_cli/ (resources, a demo model's weights and masks), the profiles and the completion scripts,
and it is imported from the installed copy, not from the source tree.

Usage: PYTHON .ci/check_installed.py SOURCE_ROOT
"""

from __future__ import annotations

import sys
from pathlib import Path

source = Path(sys.argv[1]).resolve()
sys.path = [p for p in sys.path if p and Path(p).resolve() != source]  # never the checkout itself
import maisi_cli  # noqa: E402

if getattr(maisi_cli, "__file__", None) is None:
    sys.exit(f"maisi_cli is not an installed package here (a namespace package: {list(maisi_cli.__path__)})")
installed = Path(maisi_cli.__file__).resolve().parent
problems = []
if source in installed.parents:
    problems.append(f"maisi_cli is imported from the source tree ({installed}), not from the installed package")

wanted = {p.relative_to(source / "maisi_cli").as_posix() for p in (source / "maisi_cli").rglob("*")
          if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".py", ".pyc")}
wanted |= {f"_profiles/{p.name}" for p in (source / "profiles").glob("*.toml")}
wanted |= {f"_completions/maisi.{shell}" for shell in ("bash", "zsh", "fish")}
missing = sorted(name for name in wanted if not (installed / name).is_file())
problems += [f"missing from the installed package: {name}" for name in missing]
for shell in ("bash", "zsh", "fish"):
    packaged, committed = installed / "_completions" / f"maisi.{shell}", source / "completions" / f"maisi.{shell}"
    if packaged.is_file() and packaged.read_bytes() != committed.read_bytes():
        problems.append(f"_completions/maisi.{shell} differs from completions/maisi.{shell}")
if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(1)
print(f"installed package {installed}: {len(wanted)} data files, profiles and completions present")
