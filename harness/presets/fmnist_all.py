"""Every method on Fashion-MNIST (ours): the benchmark that runs on this project's hardware."""

from harness.config import Schedule
from harness.presets import Preset

PRESET = Preset(
    name="fmnist-all",
    title="mbqbench: every method on Fashion-MNIST, ResNet-20, bits 2/4/8 (our benchmark, no published numbers)",
    dataset="fashion-mnist",
    model="resnet20",
    bits=(2, 4, 8),
    methods=("anyprecision", "dedicated", "adabits", "mbquant", "emq:score_epochs=3", "emq:prune=0"),
    schedule=Schedule(epochs=20, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True,
                      weight_decay=5e-4, lr_schedule="onecycle", augment=True),
    speedup_baseline="emq:prune=0",
    notes=(
        "Bits 2/4/8: the paper methods' common set.",
        "Schedule: the project's full-precision reference schedule (SGD nesterov, one-cycle lr 0.1, flip + pad-crop); "
        "full-precision ResNet-20 reaches 92.1% after 6 epochs on it.",
        "EMQ scores for 3 epochs (the minimum for a TDDS window; 15% of training, against 5% in the paper).",
        "On 2 CPU cores use --train-subset and --epochs; the full preset is meant for a GPU.",
    ),
    data_needs="Fashion-MNIST IDX .gz files (apt-get install dataset-fashion-mnist)",
)
