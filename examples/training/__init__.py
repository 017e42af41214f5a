"""The training machinery shared by the example pipelines (ROSMAP, BRCA, Food-101, N24News, the demo).

One module per concern; the names a pipeline needs are re-exported here::

    import training  # examples/ is the scripts' directory, so the package imports directly

    task = training.Task(
        name="ROSMAP",
        num_classes=2,
        build_model=build_model,          # top-level function -> MultimodalClassifier (picklable)
        train=training.TensorMultimodalDataset([x1, x2, x3], y),   # or any Dataset of (inputs, label)
        test=training.TensorMultimodalDataset(test_xs, test_y),
        train_labels=y,                   # for the stratified hold-out of the validation protocol
        metrics=rosmap_metrics,           # (y_true, prob) -> {"acc": ..., "f1": ..., "auc": ...}
        metric_labels={"acc": "ACC", "f1": "F1", "auc": "AUC"},
    )
    config = training.TrainConfig(method="m3col", convention="paper", epochs=500, lr=2e-3)
    results = training.run(task, config, seeds=[0, 1, 2, 3, 4], output_dir="runs/rosmap")

=========================  ===============================================================
module                     concern
=========================  ===============================================================
``config``                 :class:`TrainConfig`, :class:`Task`, methods, protocols, fingerprint
``data``                   in-memory datasets, the epoch batch sampler, the stratified hold-out
``model``                  :class:`MultimodalClassifier` and the MLP blocks
``objective``              :class:`Objective`: each method's loss from the package's API
``trainer``                :class:`Trainer`: one seed's epoch loop and protocols
``checkpoint``             a seed's run state, written and resumed
``seeds``                  :func:`run`: several seeds over worker processes, the output folder
``report``                 the summary over seeds, ``results.md``, ``curves.png``
``cli``                    validated option types, the shared options, :func:`launch`
``io``                     atomic writes, the run lock, validated loaders
``distributed``            the ``torchrun`` process group
``cputune``                glibc allocator tuning for CPU training
``datadir``                where a dataset is looked for
``recipes``                the released recipes' items and their checks
``stats``                  permutation and bootstrap tests over per-seed figures
``omics``                  the MOGONET-layout pipelines (ROSMAP, BRCA)
``imagetext``              the image-text pipelines (Food-101, N24News)
=========================  ===============================================================
"""

from training.cli import add_arguments, config_from_args, launch
from training.config import METHODS, PROTOCOLS, ConfigError, Task, TrainConfig, run_fingerprint
from training.data import EpochBatchSampler, TensorMultimodalDataset, move_to, stratified_holdout
from training.distributed import init_distributed, is_main_process, shutdown_distributed
from training.io import CorruptFileError, OutputFolderBusy, atomic_torch_save, atomic_write_json, atomic_write_text
from training.model import MultimodalClassifier, mlp
from training.objective import Objective
from training.report import results_markdown, summarise
from training.seeds import run
from training.trainer import AnalysisContext, Trainer, train_seed

__all__ = [
    "METHODS",
    "PROTOCOLS",
    "ConfigError",
    "Task",
    "TrainConfig",
    "run_fingerprint",
    "TensorMultimodalDataset",
    "EpochBatchSampler",
    "move_to",
    "stratified_holdout",
    "MultimodalClassifier",
    "mlp",
    "Objective",
    "Trainer",
    "AnalysisContext",
    "train_seed",
    "run",
    "summarise",
    "results_markdown",
    "add_arguments",
    "config_from_args",
    "launch",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "CorruptFileError",
    "OutputFolderBusy",
    "is_main_process",
    "init_distributed",
    "shutdown_distributed",
]
