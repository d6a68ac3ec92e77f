"""Train and test the fine-grained methods: a fine-tuned baseline, MC-Loss, S3N, center loss.

    python train_fgvc.py --method mcloss                        # demo: Fashion-MNIST, CPU, minutes
    python train_fgvc.py --method s3n --dataset cub-s3n --data-dir CUB   # S3N's upstream setting
    python train_fgvc.py --test RUN_DIR                         # top-1 on the test split (per branch for S3N)
    python train_fgvc.py --method mcloss --records DIR          # splits packed by training_runtime.records
    python train_fgvc.py --method mcloss --backbone resnet50_mc --data-dir CUB --gpus 0,1   # MC_ResNet50.py

Every method is a task (fgvc_gluon.task.FGVCTask) registered in
fgvc_gluon.registry.METHODS with its knobs, its upstream recipe and its demo
overrides (listed below): one SGD Trainer per parameter group (lr = schedule
lr x the group's multiplier; the center-loss centers keep their own fixed
lr), the step lr rule (cosine for MC-Loss ResNet-50), evaluation every epoch
(top-1 of the main branch drives the best checkpoint; S3N also reports each
branch), metrics.jsonl, curves.png, best/last checkpoints and exact resume
(training_runtime, shared with train_attr.py). Epochs are 0-based. ImageNet
weights are loaded for baseline, s3n and mcloss --backbone resnet50_mc as
upstream; a backbone with its own upstream recipe ("upstream with --backbone"
below) takes its values over the method's.

Demo (no --data-dir): the 10 Fashion-MNIST classes, 3,000 training and 1,000
validation images (s3n: 1,000 and 500), 3 epochs, batch 32, no lr steps, no
pretraining, final test on 2,000 test images; on 2 CPU cores baseline ~1 min
(test top-1 ~0.66), mcloss ~20 s (~0.62), s3n ~3 min (~0.66), centerloss
~1.5 min (~0.39, 2-D features). The demo lrs are lower than upstream's where
the networks train from scratch with a x10 classifier (at lr 0.01 baseline
and s3n diverge).

Deviations from the upstream scripts: on several devices each device slice
draws its own MC-Loss mask and counts its own center-loss class counts (see
the method modules); --batchnorm frozen|sync; all randomness is a function
of (--seed, epoch, step) for exact resume, evaluation included (S3N
evaluates with its random mode p=1 up to epoch 20).
"""
from fgvc_gluon.family import FAMILY
from training_runtime import app, cli


def main(argv=None, callbacks=()):
    """Run the command line ``argv``; returns the test report of a training run or --test."""
    return app.main(FAMILY, argv, __doc__, callbacks)


if __name__ == "__main__":
    cli.run_main(main)
