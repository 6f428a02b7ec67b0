"""The engine: the one loop every method runs on, in small parts.

It owns devices, precision, seeding, steps, LR schedules, evaluation, checkpoints,
logging, progress and the run folder; a method (mosaic.methods) owns only its players
and its `step`. Data flows one way: config -> data + models -> method -> engine -> run folder.

    task.py        data sets, teacher and the checks that they fit (before any folder exists)
    players.py     what a run does to a method's networks and optimizers (public: the speed bench uses it)
    schedule.py    learning-rate schedules
    loop.py        train(cfg): the loop, the divergence guard's restores, results.json
    evaluation.py  top-1 / agreement during a run, and `mosaic evaluate`
    folder.py      the run folder, atomic checkpoints, sample grids
    metrics.py     metrics.jsonl, and the experiment trackers of `log_with` (Accelerate's)
"""
from mosaic.engine.evaluation import Evaluator, evaluate
from mosaic.engine.folder import RunError, check_run_dir, checkpoints, run_dir
from mosaic.engine.loop import train
from mosaic.engine.players import prepare_players
from mosaic.engine.schedule import lr_factor
from mosaic.engine.task import per_process_batch

__all__ = ["Evaluator", "RunError", "check_run_dir", "checkpoints", "evaluate", "lr_factor", "per_process_batch",
           "prepare_players", "run_dir", "train"]
