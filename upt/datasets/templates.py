"""Which hand-written templates a run uses: the user's, the data set's, or CoOp's ensemble."""

from __future__ import annotations

from ..errors import ConfigError
from ..methods.config import DEFAULT_TEMPLATE, ENSEMBLE_TEMPLATES
from .catalogue import DATASETS
from .source import DataSource


def resolve_templates(template: str | None = None, ensemble: bool = False,
                      source: DataSource | None = None) -> tuple[str, ...]:
    """`template` (from --template) wins over the data set's own (CoOp's per-data-set template), which
    wins over "a photo of a {}.". With `ensemble`, CLIP's 7 ImageNet templates are averaged and, as
    CoOp's prompt ensemble does, the chosen template is added to them, except ImageNet's own (CoOp
    leaves it out)."""
    if template is not None and "{}" not in template:
        raise ConfigError(f"A template needs '{{}}' where the class name goes, e.g. 'a photo of a {{}}.'; "
                          f"got {template!r}.")
    chosen = template or (source.template if source is not None else None)
    if not ensemble:
        return (chosen or DEFAULT_TEMPLATE,)
    spec = DATASETS.get(source.name) if source is not None else None
    adds = chosen is not None and (template is not None or spec is None or spec.ensemble_adds_template)
    return ENSEMBLE_TEMPLATES + ((chosen,) if adds and chosen not in ENSEMBLE_TEMPLATES else ())
