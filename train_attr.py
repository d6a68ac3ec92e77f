"""Train, test and apply the imbalanced attribute model (ECCV 2018, docs/SPEC.md §1).

    python train_attr.py                       # demo: Fashion-MNIST derived attributes, CPU, minutes
    python train_attr.py --data-dir WIDER      # the original's setting (WIDER-Attribute, ResNet-101)
    python train_attr.py --test RUN_DIR        # test mAP, per-attribute APs, mA, acc, prec, rec, F1
    python train_attr.py --predict a.jpg b.jpg --weights RUN_DIR   # CSV of attribute probabilities
    python train_attr.py --records DIR         # splits packed by python -m training_runtime.records

The model, its losses and knobs are imbalanced_attr.task.AttributeTask; the
flags are generated from the run definition (training_runtime.config) and
the method's registered knobs; the recipes below are the original's settings
and the demo's. --test DIR also takes a directory of the original's .params
files (the run definition then comes from the flags).

Demo (no --data-dir): resnet18_v1 at 32x32 without pretraining, 3,000
training and 1,000 validation images, 2 epochs, batch 32, lr 0.005, ImageNet
normalisation; the final test uses 2,000 test images. About 2 minutes on 2
CPU cores. (At lr 0.05 or 0.01 the published losses diverge within ~100
steps: their naive sigmoid has a NaN gradient once a logit falls below
-88.7, IL-3; the NaN guard then stops the run.)
"""
from imbalanced_attr.family import FAMILY
from training_runtime import app, cli


def main(argv=None, callbacks=()):
    """Run the command line ``argv``; returns the test report of a training run or --test."""
    return app.main(FAMILY, argv, __doc__, callbacks)


if __name__ == "__main__":
    cli.run_main(main)
