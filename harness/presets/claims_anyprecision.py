"""Any-Precision DNNs' claims (AAAI 2021): 8 bits within 1 point of full precision, and recursive distillation
helps the lowest bit-width; AdaBits' claim (CVPR 2020): at 4 and 8 bits within 1 point of dedicated models."""

from harness.claims import Claim
from harness.config import Schedule
from harness.presets import Preset

ANYPRECISION_PAPER = "Any-Precision DNNs (Yu et al., AAAI 2021)"
ADABITS_PAPER = "AdaBits (Jin et al., CVPR 2020)"
METHODS = ("anyprecision", "anyprecision:distill=none", "adabits", "dedicated")
CLAIMS = (
    Claim("anyprecision-8bit-within-1pt-of-fp", f"{ANYPRECISION_PAPER}, Table 1", kind="no_worse",
          a="anyprecision", bits=8, b="fp", margin=1.0),
    Claim("anyprecision-distillation-helps-lowest-bits", f"{ANYPRECISION_PAPER}, Sec. 4 ablation", kind="better",
          a="anyprecision", b="anyprecision:distill=none", bits=1),
    Claim("adabits-within-1pt-of-dedicated-at-4-and-8", f"{ADABITS_PAPER}, Tables 1-2", kind="all_of", parts=(
        Claim(kind="no_worse", a="adabits", b="dedicated", bits=4, margin=1.0),
        Claim(kind="no_worse", a="adabits", b="dedicated", bits=8, margin=1.0),
    )),
)
NOTES = ("Every method on the harness topology (no fp_shortcut, AdaBits without its quantized first/last layers).",
         "'dedicated' quantizes with DoReFa (Any-Precision's dedicated row); AdaBits' paper compares with SAT-trained "
         "individual models.")

PRESETS = (
    Preset(name="claims-anyprecision-digits", title="Any-Precision and AdaBits claims (digits, ResNet-20 x0.5)",
           dataset="digits", model="resnet20", width=0.5, bits=(1, 2, 4, 8), methods=METHODS,
           schedule=Schedule(epochs=40, batch_size=64, lr=0.05, lr_schedule="cosine", weight_decay=5e-4),
           notes=NOTES, data_needs="built in (scikit-learn's digits)", claims=CLAIMS, seeds=(0, 1, 2), size="cpu"),
    Preset(name="claims-anyprecision-cifar10", title="Any-Precision and AdaBits claims (CIFAR-10, ResNet-20 x5)",
           dataset="cifar10", model="preact_resnet20", width=5.0, bits=(1, 2, 4, 8), methods=METHODS,
           schedule=Schedule(epochs=200, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=0.0,
                             lr_schedule="step", milestones=(100, 150, 180), gamma=0.1, augment=True),
           notes=NOTES, data_needs="CIFAR-10 python batches under --data-root (cifar-10-batches-py/)",
           claims=CLAIMS, seeds=(0, 1, 2), size="full"),
)
