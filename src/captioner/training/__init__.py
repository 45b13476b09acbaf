"""Training: teacher forcing (or SCST) on cached encoder features, validated by real decoding.

The package, in the order a run uses it:

- ``config``: TrainConfig and its sections, each checking itself; ``check_run`` adds the machine's checks
- ``stages``: a run with ``then`` as a chain of runs, each from the best/ of the one before
- ``loop``: ``train`` (setup, then epochs of steps, validation and saving); the entry point
- ``run``: what a run holds between epochs; ``ranks``: this process among torchrun's ranks
- ``loss``: one batch's loss for every objective (``scst``, ``scheduled_sampling``: their passes)
- ``checkpoint``: last.pt and best/, --resume; ``logs``: metrics.jsonl and curves.png
- ``budget``: the time budget (optim.max_minutes)
"""
