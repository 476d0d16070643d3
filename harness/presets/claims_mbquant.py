"""MBQuant's claims (Pattern Recognition 2025): it beats Any-Precision at 2 bits on the same network, amortized
branch selection is at least as good as serial, and in-place distillation helps (Fig. 3 ablation)."""

from harness.claims import Claim
from harness.config import Schedule
from harness.presets import Preset

MBQUANT_PAPER = "MBQuant (Zhong et al., Pattern Recognition 2025)"
METHODS = ("mbquant", "mbquant:selection=serial", "mbquant:distill=off", "anyprecision")
CLAIMS = (
    Claim("mbquant-beats-anyprecision-at-2-bits", f"{MBQUANT_PAPER}, Tables 1-2", kind="better", a="mbquant",
          b="anyprecision", bits=2),
    Claim("mbquant-amortized-no-worse-than-serial", f"{MBQUANT_PAPER}, Fig. 3", kind="no_worse", a="mbquant",
          b="mbquant:selection=serial"),
    Claim("mbquant-inplace-distillation-helps", f"{MBQUANT_PAPER}, Fig. 3", kind="better", a="mbquant",
          b="mbquant:distill=off"),
)
NOTES = ("Every method on the harness topology: the same sites, so MBQuant and Any-Precision differ in their "
         "quantizers, branches and training only.",)

PRESETS = (
    Preset(name="claims-mbquant-digits", title="MBQuant claims (digits, ResNet-20 x0.5, bits 2/4/8)",
           dataset="digits", model="resnet20", width=0.5, bits=(2, 4, 8), methods=METHODS,
           schedule=Schedule(epochs=30, batch_size=64, lr=0.05, lr_schedule="cosine", weight_decay=5e-4),
           notes=NOTES, data_needs="built in (scikit-learn's digits)", claims=CLAIMS, seeds=(0, 1, 2), size="cpu"),
    Preset(name="claims-mbquant-cifar100", title="MBQuant claims (CIFAR-100, ResNet-20, bits 2/4/6/8)",
           dataset="cifar100", model="resnet20", bits=(2, 4, 6, 8), methods=METHODS,
           schedule=Schedule(epochs=200, batch_size=128, lr=0.1, lr_schedule="cosine", weight_decay=5e-4,
                             augment=True),
           notes=NOTES, data_needs="CIFAR-100 python files under --data-root (cifar-100-python/)", claims=CLAIMS,
           seeds=(0, 1, 2), size="full"),
)
