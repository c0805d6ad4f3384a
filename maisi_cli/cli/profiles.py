"""`maisi profiles list|show`: the hardware profiles and their decode settings."""

from __future__ import annotations

import typer

from maisi_cli.cli import render
from maisi_cli.config import format_triple

app = typer.Typer(help="Hardware profiles: decode settings per GPU memory class.", no_args_is_help=True)


def profile_document(profile) -> dict:
    return profile.model_dump(mode="json")


@app.command("list")
def list_command(ctx: typer.Context, json_flag: bool = typer.Option(False, "--json", help="Print one JSON document.")) -> None:
    """List the profiles."""
    from maisi_cli.profiles import list_profiles

    output = render.output_of(ctx.obj, json_flag)
    profiles = sorted(list_profiles(), key=lambda p: (p.device != "cuda", p.memory_gb or 0, p.name))
    if output.json:
        render.print_json({"profiles": [profile_document(p) for p in profiles]})
        return
    rows = [(p.name, p.device, f"{p.memory_gb:g} GB" if p.memory_gb else "-", p.precision,
             ", ".join(format_triple(e.size) for e in p.decode) or "-", p.description) for p in profiles]
    render.print_table(None, ("profile", "device", "memory", "precision", "tabled sizes", "for"), rows)


@app.command("show")
def show_command(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Profile name or .toml path."),
    json_flag: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Show one profile's decode table and its rule for other sizes."""
    from maisi_cli.profiles import get_profile

    output = render.output_of(ctx.obj, json_flag)
    profile = get_profile(name)
    if output.json:
        render.print_json(profile_document(profile))
        return
    render.info(f"{profile.name}: {profile.description} ({profile.device}, {profile.precision}) — {profile.path}", output)
    rows = [(format_triple(e.size), format_triple(e.roi), f"{e.overlap:g}", e.tp_splits, e.source or "") for e in profile.decode]
    rule = profile.fallback
    rows.append(("other sizes", f"≤ {rule.max_roi_latent_voxels} voxels", f"{rule.overlap:g}", rule.tp_splits, "fallback rule"))
    render.print_table(None, ("image size", "decode ROI (latent)", "overlap", "TP splits", "source"), rows)
