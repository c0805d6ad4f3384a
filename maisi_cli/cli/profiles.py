"""`maisi profiles list|show|plan`: the hardware profiles, their decode settings, and the memory planner."""

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
    if profile.device == "cuda" and profile.memory_gb:
        rows.append(("other sizes", "memory planner", f"≥ {rule.overlap:g}", "planned",
                     f"fits {profile.memory_gb:g} GiB (maisi profiles plan)"))
    else:
        rows.append(("other sizes", f"≤ {rule.max_roi_latent_voxels} voxels", f"{rule.overlap:g}", rule.tp_splits,
                     "fallback rule"))
    render.print_table(None, ("image size", "decode ROI (latent)", "overlap", "TP splits", "source"), rows)


@app.command("plan")
def plan_command(
    ctx: typer.Context,
    size: str = typer.Option(..., "--size", help="Output image size, e.g. 512x512x512."),
    memory: str | None = typer.Option(None, "--memory",
                                      help="GPU memory budget: 24g, 80GiB, 512m or bytes (binary units). "
                                           "Default: the --profile's memory, else 24g."),
    model: str = typer.Option("rflow-ct", "--model", help="Model name or spec .json."),
    profile: str | None = typer.Option(None, "--profile", help="GPU profile whose tabled ROIs and overlap to use."),
    json_flag: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Predict peak GPU memory (diffusion loop and decode) and pick the fastest decode plan that fits."""
    from maisi_cli.config import parse_size
    from maisi_cli.decode_plan import parse_memory, plan_decode
    from maisi_cli.gpu_memory import GIB, estimate_peak_memory
    from maisi_cli.models import get_model
    from maisi_cli.profiles import get_profile

    output = render.output_of(ctx.obj, json_flag)
    image_size = parse_size(size)
    chosen_profile = get_profile(profile) if profile else None
    if memory is not None:
        budget = parse_memory(memory)
    elif chosen_profile is not None and chosen_profile.budget_bytes:
        budget = chosen_profile.budget_bytes
    else:
        budget = 24 * GIB
    spec = get_model(model)
    spec.check_request(image_size, spec.default_spacing(image_size), allow_any_size=True)
    rois = [e.roi for e in chosen_profile.decode] if chosen_profile else []
    overlap = chosen_profile.fallback.overlap if chosen_profile else 0.4
    best = plan_decode(spec, image_size, budget, rois=rois, min_overlap=overlap)
    document = {"model": spec.name, "size": list(image_size), "budget_gib": round(budget / GIB, 2),
                "plan": best.plan.model_dump(mode="json"), "relative_decode_time": round(best.cost, 3),
                "memory": best.estimate.as_dict()}
    table_plan = None
    if chosen_profile is not None:
        latent = spec.latent_shape(image_size)[1:]
        split_axis = int(spec.definition("autoencoder").get("dim_split", 1))
        table_plan = chosen_profile.decode_plan(latent, image_size, split_axis=split_axis, spec=spec)
        document["profile"] = {"name": chosen_profile.name, "plan": table_plan.model_dump(mode="json"),
                               "memory": estimate_peak_memory(spec, image_size, table_plan).as_dict()}
    if output.json:
        render.print_json(document)
        return
    estimate = best.estimate
    render.info(f"{spec.name} {format_triple(image_size)} (latent {format_triple(estimate.latent)}), budget "
                f"{budget / GIB:.1f} GiB: decode {best.plan.mode}, ROI {format_triple(best.plan.roi)}, overlap "
                f"{best.plan.overlap:g}, {best.plan.tp_splits} TP splits, {best.plan.windows} window(s); predicted "
                f"peak {estimate.peak_bytes / GIB:.1f} GiB ({estimate.peak_stage}); relative decode time "
                f"{best.cost:.2f}", output)
    terms = sorted(set(estimate.diffusion_terms) | set(estimate.decode_terms), key=lambda t: t != "framework overhead")
    rows = [(t, _gib(estimate.diffusion_terms.get(t)), _gib(estimate.decode_terms.get(t))) for t in terms]
    rows.append(("peak", _gib(estimate.diffusion_bytes), _gib(estimate.decode_bytes)))
    render.print_table(None, ("term", "diffusion loop", "decode"), rows)
    if table_plan is not None:
        other = estimate_peak_memory(spec, image_size, table_plan)
        render.info(f"profile {chosen_profile.name} ({table_plan.rule}): ROI {format_triple(table_plan.roi)}, "
                    f"{table_plan.tp_splits} TP splits, predicted peak {other.peak_bytes / GIB:.1f} GiB", output)


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 1024**3:.2f} GiB"
