"""The suite's defaults, each written once (torch-free; read by the command line, the grid loader, the
training configuration and the models).

* ``DEFAULT_GRID``: what ``snakemake`` and ``maskconnect grid`` run without a grid (the digits demo).
* ``DEFAULT_RECIPE``: the recipe of ``maskconnect train`` and of a grid entry that names none.
* ``MASK_RULE_NAMES`` / ``DEFAULT_MASK_RULE``: the mask update rules (``maskconnect.mask_rules.MASK_RULES``
  implements each) and the one chosen by measurement (docs/mask_rules.md); a recipe names its own.
* ``DEFAULT_MASK_INIT``: the real-valued masks' initial value (docs/design.md section 4).
"""

from __future__ import annotations

DEFAULT_GRID = "demo"
DEFAULT_RECIPE = "demo"
MASK_RULE_NAMES = ("clip", "centred", "projected")
DEFAULT_MASK_RULE = "projected"
DEFAULT_MASK_INIT = 0.5
