"""Any-Precision DNNs, CIFAR-10 ResNet-20 (x5): the authors' README table (Dedicated and recursive)."""

from harness.claims import Claim
from harness.config import Schedule
from harness.presets import Preset

PRESET = Preset(
    name="anyprecision-cifar10-resnet20",
    title="Any-Precision DNNs (AAAI 2021), CIFAR-10, pre-activation ResNet-20 x5, bits 1/2/4/8/32",
    dataset="cifar10",
    model="preact_resnet20",
    width=5.0,
    bits=(1, 2, 4, 8, 32),
    methods=("dedicated:fp_shortcut=true", "anyprecision:fp_shortcut=true"),
    schedule=Schedule(epochs=200, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=0.0,
                      lr_schedule="step", milestones=(100, 150, 180), gamma=0.1, augment=True),
    notes=(
        "Recipe from the authors' training script (Adam 1e-3, wd 0, x0.1 at 100/150/180, pad-4 crop + flip).",
        "Trained from scratch; no BN recalibration at evaluation.",
        "The authors' README gives no seed count or variance; published cells are single numbers.",
    ),
    data_needs="CIFAR-10 python batches under --data-root (cifar-10-batches-py/)",
    claims=(
        # one-sided: the 8-bit model exceeding full precision would not contradict "no loss beyond 1 point"
        Claim("anyprecision-8bit-within-1pt-of-fp", "Any-Precision DNNs (AAAI 2021), authors' README, CIFAR-10 "
              "ResNet-20 (x5) table (8-bit 93.75 vs 32-bit 94.11)", kind="no_worse",
              a="anyprecision:fp_shortcut=true", bits=8, b="fp", margin=1.0),
    ),
)
