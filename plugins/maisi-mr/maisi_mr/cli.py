"""`maisi mr`: the MR models and modality ids this plugin adds (mounted by maisi from the maisi.commands group)."""

from __future__ import annotations

import typer

app = typer.Typer(help="MR models of MAISI v2 (plugin maisi-mr): their modality ids and weight files.",
                  no_args_is_help=True)


@app.command("modalities")
def modalities(json_flag: bool = typer.Option(False, "--json", help="Print one JSON document.")) -> None:
    """List the MR modality ids the networks take (maisi's built-in ones and this plugin's)."""
    from maisi_cli.cli import render
    from maisi_cli.labels import modality_mapping

    from maisi_mr import MODALITIES

    rows = [(name, ident, "maisi-mr" if name in MODALITIES else "maisi")
            for name, ident in sorted(modality_mapping().items(), key=lambda item: item[1]) if name.startswith("mri")]
    if json_flag:
        render.print_json({"modalities": [{"name": n, "id": i, "from": f} for n, i, f in rows]})
        return
    render.print_table(None, ("modality", "id", "from"), rows)


@app.command("info")
def info(json_flag: bool = typer.Option(False, "--json", help="Print one JSON document.")) -> None:
    """Show the MR models: modality, default size and spacing, weight files and their Hugging Face repository."""
    from maisi_cli.cli import render
    from maisi_cli.config import format_triple
    from maisi_cli.models import get_model

    specs = [get_model(name) for name in ("rflow-mr", "rflow-mr-brain")]
    if json_flag:
        render.print_json({"models": [{"name": s.name, "modality": s.modality, "modality_id": s.modality_id,
                                       "default_size": list(s.default_size), "hf_repo": s.hf_repo,
                                       "weights": dict(s.weights)} for s in specs]})
        return
    rows = [(s.name, f"{s.modality} ({s.modality_id})", format_triple(s.default_size),
             format_triple(s.default_spacing(s.default_size)), s.hf_repo, ", ".join(s.weights.values()))
            for s in specs]
    render.print_table(None, ("model", "modality", "size", "spacing", "repository", "weights"), rows)
