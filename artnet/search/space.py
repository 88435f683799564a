"""The search space: config fields (dotted, as `--set` names them) and the distribution each is drawn from.

Written on the command line as `--space model.dropout=uniform:0.1,0.6` (repeatable) or in a YAML file of
`field: "distribution:args"`; the forms are `choice:a,b,c`, `uniform:lo,hi`, `loguniform:lo,hi` and
`randint:lo,hi` (both ends included). Every field must be a config field and every value it can take must pass
the job config's own checks, so a bad space fails before any cluster work with the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

from artnet.config import ConfigError, JobConfig, override

KINDS = ("choice", "uniform", "loguniform", "randint")

# Head-only trials on cached features: what the study tuned by hand, and the imbalance remedies.
DEFAULT_SPACE = {
    "model.head_depth": "choice:0,1,2,3",
    "model.head_width": "choice:256,512,1024",
    "model.dropout": "uniform:0.0,0.6",
    "train.lr": "loguniform:0.001,0.03",
    "train.label_smoothing": "choice:0.0,0.1",
    "train.class_balance": "choice:none,weights,logit_adjust",
}


# Fields only the images can tell about: a dimension over one of these runs fine-tuning trials (each an
# `artnet train` job, phase 2 from the count's best head) instead of head trials on cached features.
FINETUNE_FIELDS = ("train.unfreeze_blocks", "train.finetune_epochs", "train.finetune_lr_factor")


@dataclass(frozen=True)
class Dimension:
    field: str
    kind: str
    values: tuple  # choice: the options; otherwise (low, high)


def parse_dimension(field: str, text: str) -> Dimension:
    kind, sep, args = str(text).partition(":")
    kind = kind.strip()
    if not sep or kind not in KINDS:
        raise ConfigError(f"search space {field}", f"is {text!r}",
                          f"write DISTRIBUTION:ARGS with a distribution of {', '.join(KINDS)}, e.g. uniform:0.1,0.5")
    items = [a.strip() for a in args.split(",") if a.strip()]
    if kind == "choice":
        if not items:
            raise ConfigError(f"search space {field}", "has no options", "list them: choice:a,b,c")
        return Dimension(field, kind, tuple(_number_or_text(a) for a in items))
    try:
        low, high = (int(a) if kind == "randint" else float(a) for a in items)
    except ValueError:
        raise ConfigError(f"search space {field}", f"{kind} needs two numbers, got {args!r}",
                          f"write {kind}:LOW,HIGH") from None
    if not low < high or (kind == "loguniform" and low <= 0):
        raise ConfigError(f"search space {field}", f"has bounds {low}, {high}",
                          "use LOW < HIGH (and LOW > 0 for loguniform)")
    return Dimension(field, kind, (low, high))


def _number_or_text(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_space(entries: dict[str, str], base: JobConfig) -> list[Dimension]:
    """Dimensions from `field -> spec`, each checked against `base`: the field exists and every extreme value
    passes the config's validation."""
    dims = [parse_dimension(field, spec) for field, spec in entries.items()]
    for dim in dims:
        section = dim.field.partition(".")[0]
        for value in dim.values:  # every option, or both ends: what bounds a trial's value
            changed = override(base, {dim.field: str(value)})  # an unknown field fails here, named
            getattr(changed, section).validate()  # a value the field cannot take fails here, named
    return dims


def space_entries(assignments: list[str], yaml_text: str | None = None) -> dict[str, str]:
    """`field -> spec` from a YAML mapping (flat dotted keys or nested sections) and `--space` items (later
    wins); the default space when both are empty."""
    import yaml

    entries: dict[str, str] = {}

    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                entries[f"{prefix}{key}"] = "choice:" + ",".join(map(str, value)) if isinstance(value, list) else str(value)

    if yaml_text:
        walk(yaml.safe_load(yaml_text) or {})
    for item in assignments:
        field, sep, spec = item.partition("=")
        if not sep:
            raise ConfigError(item, "is not FIELD=DISTRIBUTION:ARGS", "write e.g. --space model.dropout=uniform:0.1,0.5")
        entries[field.strip()] = spec.strip()
    if all(field in FINETUNE_FIELDS for field in entries):  # nothing said about the head: the default head space
        entries = {**DEFAULT_SPACE, **entries}
    return entries


def split(dims: list[Dimension]) -> tuple[list[Dimension], list[Dimension]]:
    """(head dimensions, fine-tuning dimensions)."""
    return ([d for d in dims if d.field not in FINETUNE_FIELDS], [d for d in dims if d.field in FINETUNE_FIELDS])


def to_tune(dims: list[Dimension]) -> dict:
    """Ray Tune's param_space for the dimensions."""
    from ray import tune

    out = {}
    for dim in dims:
        if dim.kind == "choice":
            out[dim.field] = tune.choice(list(dim.values))
        elif dim.kind == "uniform":
            out[dim.field] = tune.uniform(*dim.values)
        elif dim.kind == "loguniform":
            out[dim.field] = tune.loguniform(*dim.values)
        else:
            out[dim.field] = tune.randint(dim.values[0], dim.values[1] + 1)  # both ends included
    return out
