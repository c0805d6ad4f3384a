"""`maisi profiles list|show|plan`: the hardware profiles, their decode settings, and the memory planner."""

from __future__ import annotations

from pathlib import Path

import typer

from maisi_cli.cli import render
from maisi_cli.config import format_triple
from maisi_cli.errors import UsageError

app = typer.Typer(help="Hardware profiles: decode settings per GPU memory class.", no_args_is_help=True)


def profile_document(profile) -> dict:
    return profile.model_dump(mode="json")


@app.command("list")
def list_command(ctx: typer.Context,
                 json_flag: bool = typer.Option(False, "--json", help="Print one JSON document.")) -> None:
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
    render.info(f"{profile.name}: {profile.description} ({profile.device}, {profile.precision}) — {profile.path}",
                output)
    rows = [(format_triple(e.size), format_triple(e.roi), f"{e.overlap:g}", e.tp_splits, e.source or "")
            for e in profile.decode]
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
    size: str = typer.Option(..., "--size", metavar="WxHxD", help="Output image size, e.g. 512x512x512."),
    memory: str | None = typer.Option(None, "--memory", metavar="SIZE",
                                      help="GPU memory free for maisi: 24g, 80GiB, 512m or bytes (binary units); "
                                           "the plan `generate --profile auto` makes on such a GPU. Default: the "
                                           "--profile's memory, else 24g."),
    model: str = typer.Option("rflow-ct", "--model", metavar="NAME", help="Model name or spec .json."),
    profile: str | None = typer.Option(None, "--profile", metavar="NAME",
                                       help="The plan `generate --profile NAME` uses (default: auto, from --memory)."),
    plot: Path | None = typer.Option(None, "--plot", metavar="FILE.png",
                                     help="Also draw the predicted memory of each stage against the budget as a "
                                          "bar chart (PNG)."),
    json_flag: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Predict the peak GPU memory (diffusion loop and decode) of the decode plan `maisi generate` will use, and say
    why it uses it: a profile's tabled size takes the reference's settings, another size the fastest plan that fits
    the profile's memory."""
    from maisi_cli.config import parse_size
    from maisi_cli.decode_plan import decode_cost, parse_memory
    from maisi_cli.gpu_memory import GIB, estimate_peak_memory
    from maisi_cli.models import get_model
    from maisi_cli.profiles import auto_gpu_profile, get_profile

    output = render.output_of(ctx.obj, json_flag)
    if plot is not None and plot.suffix.lower() != ".png":
        raise UsageError(f"--plot: '{plot}' is not a .png name; e.g. --plot plan.png")
    image_size = parse_size(size)
    spec = get_model(model)
    spec.check_request(image_size, spec.default_spacing(image_size), allow_any_size=True)
    budget = parse_memory(memory) if memory is not None else None
    if profile is not None and profile != "auto":
        chosen = get_profile(profile)
        if chosen.device != "cuda":
            raise UsageError(f"--profile: {chosen.name} is a {chosen.device} profile; `profiles plan` predicts GPU "
                             "memory: name a GPU profile (see `maisi profiles list`)")
        if budget is not None:  # the profile on a card with this much free (as `auto` sets it)
            chosen = chosen.model_copy(update={"memory_gb": round(budget / GIB, 3)})
        command, where = f"maisi generate --profile {profile}", ""
    else:
        budget = budget if budget is not None else 24 * GIB
        chosen = auto_gpu_profile(budget)
        command, where = "maisi generate --profile auto", f" on a GPU with {budget / GIB:g} GiB free"
    budget = chosen.budget_bytes or budget or 24 * GIB
    latent = spec.latent_shape(image_size)[1:]
    split_axis = int(spec.definition("autoencoder").get("dim_split", 1))
    plan = chosen.decode_plan(latent, image_size, split_axis=split_axis, spec=spec)
    estimate = estimate_peak_memory(spec, image_size, plan)
    fits = estimate.peak_bytes <= budget
    why = plan_reason(plan.rule, chosen.name, image_size)
    document = {"model": spec.name, "size": list(image_size), "budget_gib": round(budget / GIB, 2),
                "profile": {"name": chosen.name, "plan": plan.model_dump(mode="json"), "memory": estimate.as_dict()},
                "command": command, "why": why, "fits": fits,
                "plan": plan.model_dump(mode="json"), "relative_decode_time": round(decode_cost(latent, plan), 3),
                "memory": estimate.as_dict()}
    if plot is not None:
        from maisi_cli.engine.plan_chart import plan_memory_chart

        document["plot"] = str(plan_memory_chart(estimate, budget, plot, title=(
            f"{spec.name} {format_triple(image_size)}: profile {chosen.name}, decode {plan.mode} ROI "
            f"{format_triple(plan.roi)}, {plan.tp_splits} TP splits")))
    if output.json:
        render.print_json(document)
        return
    render.info(f"{spec.name} {format_triple(image_size)} (latent {format_triple(estimate.latent)}): "
                f"`{command}`{where} uses profile {chosen.name}: decode {plan.mode}, "
                f"ROI {format_triple(plan.roi)}, overlap {plan.overlap:g}, {plan.tp_splits} TP splits, "
                f"{plan.windows} window(s); predicted peak {estimate.peak_bytes / GIB:.1f} GiB "
                f"({estimate.peak_stage}), {'within' if fits else 'OVER'} {budget / GIB:.1f} GiB; "
                f"relative decode time {decode_cost(latent, plan):.2f}", output)
    render.info(f"why: {why}", output)
    terms = sorted(set(estimate.diffusion_terms) | set(estimate.decode_terms), key=lambda t: t != "framework overhead")
    rows = [(t, _gib(estimate.diffusion_terms.get(t)), _gib(estimate.decode_terms.get(t))) for t in terms]
    rows.append(("peak", _gib(estimate.diffusion_bytes), _gib(estimate.decode_bytes)))
    render.print_table(None, ("term", "diffusion loop", "decode"), rows)
    if plot is not None:
        render.info(f"chart: {document['plot']}", output)


def plan_reason(rule: str, profile: str, size: tuple[int, int, int]) -> str:
    """Why the profile gives this plan, from the rule its decode_plan recorded."""
    shown = format_triple(size)
    if " table " in rule:
        return (f"{shown} is in profile {profile}'s table, so generate takes the reference's settings for it ({rule}) "
                "rather than planning one")
    if " planner " in rule:
        return (f"{shown} is not in profile {profile}'s table, so generate takes the fastest plan whose predicted "
                f"peak fits the profile's memory ({rule})")
    return f"{shown} is not in profile {profile}'s table and it has no memory to plan for: {rule}"


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 1024**3:.2f} GiB"
