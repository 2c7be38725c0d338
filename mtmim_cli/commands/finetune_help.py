"""The texts of `mtmim finetune`: its --help text and the `--help-recipes` page, which holds
what would push --help past 160 lines at 80 columns: the tables (each recipe's settings
beside the paper's, each encoder's stages) and the detail of the options for small sets.
The tables are read from RECIPES and the backbone registry, so the page stays true as they
change; no torch here."""

from __future__ import annotations

import textwrap
from collections.abc import Callable

import typer

from mtmim_cli.models.backbones import stage_table
from mtmim_cli.train.finetune_options import RECIPE_NAMES, RECIPES
from mtmim_cli.train.finetune_options import default as D

WIDTH = 80   # the page is plain text printed as is: it fits an 80-column terminal


def finetune_text() -> str:
    """The command's text: what the short option help leaves out."""
    return f"""MT-MIM fine-tuning: factorization, age groups, CLUB penalty with alternating q updates.

    --init takes our pretrain checkpoint, an insightface iresnet backbone.pth (with
    --backbone), the shared MobileFaceNet ckpt or an ONNX face encoder (*.onnx; --backbone
    onnx:SPEC for its input). --mi-target: features (the paper: CLUB between x_id and x_age
    with a Gaussian q), age-group (CLUB between x_id and the age group, categorical q) or
    lautum (mean KL from the group prior to q(group | x_id)). The paper's linear
    factorization makes x_age a function of x_id, so 'features' can fall without age leaving
    x_id. q's learning rate drops by 10 with the encoder's on plateau.

    --recipe ({', '.join(RECIPE_NAMES)}): a named bundle of the options for small training
    sets (auto, for a new encoder: chosen on validation people of the training side); options
    given override it, without it the paper's settings apply. --help-recipes shows
    each recipe's settings, each encoder's stages for --freeze-through (last:K = all but the
    last K stages, auto = last:2) and what the options for small sets do: --freeze-bn,
    --init-centres, --l2sp, --wise, --head-warmup-steps, --augment, --activation-cache,
    --replay, --val-identities. --lr trains factorization and heads, and the encoder unless
    --encoder-lr.

    Identity lists (--train-identities, --replay-identities): comma-separated names, @FILE
    (one per line) or @FILE.json:key.path (e.g. @open-set.json:fgnet.train_subjects); whole
    numbers match by value (1 = '001'). --identities: auto (caches of one align job share
    names, others keep theirs apart), by-name or per-cache (docs/SCALE.md). --partial-fc
    RATE splits the class centres over torchrun processes and keeps that share per step
    (1.0 = split only). --batch-size is global (split over torchrun processes); --accumulate
    N sums N micro-batches' gradients (BatchNorm sees micro-batches; q fits the whole
    batch). --workers -1 = the cores per process less one, at most 8.
    """


# What each option for small sets does (their one-phrase help in --help points here).
SMALL_SET_OPTIONS = (
    "--freeze-bn stats keeps every encoder BatchNorm in eval mode (affine still trained); "
    "all fixes the affine too.",
    "--init-centres mean starts each class centre at its mean x_id under the initial "
    "encoder; mean-mirror averages each image with its mirror first.",
    "--l2sp ALPHA adds (alpha/2)||w - w0||^2 toward the encoder's initial weights instead "
    "of weight decay (heads keep --weight-decay).",
    "--wise ALPHA writes (1 - ALPHA) x initial + ALPHA x trained weights (WiSE-FT).",
    "--head-warmup-steps keeps the encoder out of the optimiser at first (BatchNorm "
    "statistics fixed; fresh Adam state at release).",
    "--augment: none, light, or key=value pairs over it (brightness, contrast, saturation, "
    "scale: max relative change; translate: pixels; rotate: degrees; grey: probability), "
    "e.g. 'light,grey=0.3', drawn per (seed, epoch, image); images only, not cached "
    "activations.",
    "--activation-cache: the frozen trunk's activations are computed once and cached there "
    "(default --out/activations; keyed by weights, images, stage, crop and dtype, so runs "
    "share them; off = train on images, needed for --augment).",
    "--replay caches get classes of their own, no age loss, and stay out of CLUB and q; "
    "--replay-ratio is their share of each batch.",
    "--val-identities carves identities (a count, or a fraction below 1) out of the first "
    "cache and validates on their cross-age pairs; --early-stop and --keep best act on it.",
)


def _wrap(text: str, indent: str = "", hang: str | None = None) -> list[str]:
    """`text` wrapped to the page's width; `hang`: the indent of the lines after the first."""
    return textwrap.wrap(text, WIDTH, initial_indent=indent,
                         subsequent_indent=indent if hang is None else hang,
                         break_on_hyphens=False)


def _table(rows: list[list[str]]) -> list[str]:
    """Left-aligned columns two spaces apart, indented by two; a last column too long for
    the line wraps under itself."""
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]) - 1)]
    lines = []
    for r in rows:
        head = "  " + "".join(c.ljust(w + 2) for c, w in zip(r[:-1], widths, strict=True))
        rest = textwrap.wrap(r[-1], WIDTH - len(head), break_on_hyphens=False) or [""]
        lines += [head + rest[0], *(" " * len(head) + t for t in rest[1:])]
    return lines


def _option_names(command: typer.core.TyperCommand,
                  library_name: dict[str, str]) -> dict[str, str]:
    """Library setting name -> the command's option ('s' -> '--scale'); `library_name` holds
    the options whose library name differs."""
    return {library_name.get(p.name, p.name): p.opts[0] for p in command.params
            if p.param_type_name == "option" and p.name}


def _value(v: object) -> str:
    return "-" if v is None else str(v)


def recipes_page(command: typer.core.TyperCommand, library_name: dict[str, str]) -> str:
    """The `--help-recipes` page: every recipe's settings beside the paper's (under the
    options of `command`), the stages --freeze-through takes per encoder, and what each
    option for small sets does."""
    options = _option_names(command, library_name)
    keys = list(dict.fromkeys(k for r in RECIPES.values() for k in r))
    rows = [["setting", "paper", *RECIPES]]
    rows += [[options.get(k, f"{k} (no option)"), _value(D(k)),
              *(_value(r.get(k, D(k))) for r in RECIPES.values())] for k in keys]
    stages = [[family, names] for family, names in stage_table().items()]
    stages.append(["ONNX", "its weight layers, named in the refusal of a wrong name"])
    lines = [
        *_wrap("mtmim finetune --recipe NAME: a named bundle of settings for small training "
               "sets (a general-face model fine-tuned on a few thousand cross-age photos). "
               "Options given on the command line override the recipe's values; without "
               "--recipe the paper's settings apply. Why each value: the comments of "
               "mtmim_cli/train/finetune_options.py and docs/results.md."),
        "",
        *_table(rows),
        "",
        *_wrap(_auto_text()),
        "",
        *_wrap("--freeze-through STAGE freezes the encoder up to and including STAGE (eval "
               "mode, no gradient) and trains the rest; last:K = all but the last K stages, "
               "auto = last:2. The stages:"),
        "",
        *_table(stages),
        "",
        "The options for small sets:",
        "",
        *(line for text in SMALL_SET_OPTIONS for line in _wrap(text, "  ", "    ")),
    ]
    return "\n".join(lines)


def _auto_text() -> str:
    """The paragraph on --recipe auto, read from its declared search."""
    from mtmim_cli.orchestration import auto_recipe as A

    grid = "; ".join(f"{k} {', '.join(f'{v:g}' for v in vs)}" for k, vs in A.GRID.items())
    return (f"--recipe auto (what a new encoder gets): {A.BASE_RECIPE}'s bundle, with a grid "
            f"searched on {A.FOLDS} identity-grouped validation folds of the training "
            f"identities ({grid}; depth = the last K stages train, lambda in mode mtmim "
            f"only, an option given fixes its axis). Criterion: young (<= {A.YOUNG_MAX:g}) "
            f"vs adult (>= {A.ADULT_MIN:g}) verification AUC, rank-1 where there are no "
            f"such pairs, against the init with a paired {A.LEVEL:.0%} identity-bootstrap "
            f"interval; --auto-guard CACHE: general-face leave-one-out rank-1 may not fall "
            f"by more than {A.GUARD_TOLERANCE:g} nor with its paired interval wholly below "
            "zero, for the candidates and again for the retrained choice (refused: the best "
            f"candidate of a lower WiSE alpha, {A.FINAL_TRIES} at most). No candidate above the init beyond its "
            "interval: the model written equals the init. The chosen setting is retrained on "
            "all training identities; config.json, model.pt and `mtmim report` record the "
            "search.")


def show_recipes(library_name: dict[str, str]) -> Callable[[typer.Context, bool], None]:
    """The callback of the eager `--help-recipes`: print the page and exit 0 before any
    argument is checked (like --help)."""
    def callback(ctx: typer.Context, value: bool) -> None:
        if value and not ctx.resilient_parsing:
            typer.echo(recipes_page(ctx.command, library_name))
            raise typer.Exit()
    return callback
