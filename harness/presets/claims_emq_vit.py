"""EMQ's claim on a vision transformer (NeurIPS 2025 reports ResNets and ViTs): the coreset at 80 % pruning is
within 1 point of full-data multi-bit training at 3.5x less device time, on a DeiT. Beside it, the suite's own
bar for the ViT path (not a paper statement): EMQ's full-data network within 2 points of the full-precision
reference at 8 bits and within 4 at 4 bits, on the same schedule.

``claims-emq-vit-digits`` runs ``deit_micro`` (the DeiT block at depth 6, embed 96, 4x4 tokens of 2x2 pixels) on
digits with the small-data ViT recipe, sized for 2 CPU cores; ``claims-emq-vit-imagenet`` is DeiT-Tiny on
ImageNet with DeiT's recipe, for GPUs.
"""

from harness.claims import Claim
from harness.config import Schedule
from harness.presets import Preset
from harness.presets.claims_emq import EMQ_PAPER
from harness.recipes import DEIT_RECIPE, VIT_SMALL_DATA_RECIPE

SUITE_GOAL = "mbqbench's bar for the ViT path (a suite goal, not a paper statement)"
METHODS = ("emq", "emq:prune=0")
CLAIMS = (
    Claim("emq-vit-coreset-within-1pt-at-3.5x-less-time", f"{EMQ_PAPER}, abstract (ResNets and ViTs, 80 % pruning)",
          kind="all_of", parts=(
              Claim(kind="within", a="emq", b="emq:prune=0", margin=1.0),
              Claim(kind="cost_ratio", a="emq:prune=0", b="emq", ratio=3.5, cost="device_hours"),
          )),
    Claim("emq-vit-full-data-near-fp", SUITE_GOAL, kind="all_of", parts=(
        Claim(kind="no_worse", a="emq:prune=0", b="fp", bits=8, margin=2.0),
        Claim(kind="no_worse", a="emq:prune=0", b="fp", bits=4, margin=4.0),
    )),
)
NOTES = ("Every linear layer but the classifier has StatsQ weights and LSQ inputs; the patch embedding, the layer "
         "norms and the classifier stay full precision (the harness's ViT topology).",
         "No augmentation on digits; the recipe has no label smoothing, mixup or stochastic depth (DeiT's), since "
         "every method computes its own loss.",
         "The paper's ViT recipe and bit-widths are not in the material the suite was built from: 4 and 8 bits, "
         "DeiT's optimizer recipe.")


def _schedule(recipe, epochs: int, batch_size: int) -> Schedule:
    return Schedule(epochs=epochs, batch_size=batch_size, **recipe.settings(epochs, batch_size))


PRESETS = (
    # 60 epochs at batch 32: a 20 % coreset is 9 steps per epoch and 3 scoring epochs a quarter of its passes
    Preset(name="claims-emq-vit-digits", title="EMQ claims on a ViT: coreset vs full data, full data vs fp "
           "(digits, deit_micro)", dataset="digits", model="deit_micro", bits=(4, 8), methods=METHODS,
           schedule=_schedule(VIT_SMALL_DATA_RECIPE, 60, 32), notes=NOTES,
           data_needs="built in (scikit-learn's digits)", speedup_baseline="emq:prune=0", claims=CLAIMS,
           seeds=(0, 1, 2), size="cpu"),
    Preset(name="claims-emq-vit-imagenet", title="EMQ claims on a ViT: coreset vs full data, full data vs fp "
           "(ImageNet, DeiT-Tiny)", dataset="imagenet", model="deit_tiny", bits=(4, 8), methods=METHODS,
           schedule=_schedule(DEIT_RECIPE, 300, 1024), notes=NOTES,
           data_needs="ImageNet train/ and val/ class folders under --data-root (imagenet/)",
           speedup_baseline="emq:prune=0", claims=CLAIMS, seeds=(0, 1, 2), size="full"),
)
