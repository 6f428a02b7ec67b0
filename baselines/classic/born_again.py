"""Born-again networks: generations of the student's architecture, each distilled from the previous one."""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor, nn

from baselines.classic.common import StreamMethod, check_fraction, test_top1
from mosaic.config import ConfigError
from mosaic.losses import hinton_kd
from mosaic.methods import Context, register_method
from mosaic.models import create_model, freeze, unwrap_model


@register_method("born_again")
class BornAgain(StreamMethod):
    """BAN (Furlanello et al. 2018): the run's steps split into generations; generation g+1 learns from g.

    Generation 1 is taught by the run's teacher. At each boundary the current student is frozen as the
    next teacher, the student is re-initialised (randomly, seeded per generation; student.checkpoint is
    not reloaded), its optimizer state is reset and (by default) its learning-rate schedule restarts.
    The evaluated model is the last generation; `results()` adds every generation's and the
    generations' ensemble's test top-1.
    """
    defaults = {
        "generations": 3,           # number of student generations sharing the run's steps evenly
        "temperature": 1.0,         # KD temperature (BAN matches the teacher's plain softmax, T=1)
        "alpha": 1.0,               # weight of the KD term; 1 - alpha goes to CE on labels (BAN: 1, teacher only)
        "restart_schedule": True,   # each generation runs the run's LR schedule over its own steps
        "stream": "train",          # train: labelled in-domain images | ood: the unlabelled OOD pool
    }

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        g = self.opts["generations"]
        if isinstance(g, bool) or not isinstance(g, int) or not 1 <= g <= ctx.steps:
            raise ConfigError(f"born_again.generations must be an integer in [1, steps={ctx.steps}], got {g!r}")
        check_fraction(self.name, "alpha", self.opts["alpha"])
        self.frozen: list[nn.Module] = []  # students of the finished generations, oldest first
        self.student_opt = self.student_optimizer()

    def boundaries(self) -> list[int]:
        """Step indices at which generations 2..G begin (the steps split as evenly as integers allow)."""
        g, steps = self.opts["generations"], self.ctx.steps
        return [i * steps // g for i in range(1, g)]

    def generation_of(self, step: int) -> int:
        """0-based generation that trains at step index `step`."""
        return sum(step >= b for b in self.boundaries())

    def current_teacher(self) -> nn.Module:
        """The run's teacher for generation 1, else the last frozen generation."""
        return self.frozen[-1] if self.frozen else self.teacher

    def _fresh_student_state(self, generation: int) -> dict:
        """Weights of a newly initialised student, seeded by run seed and generation (equal on every process)."""
        s = self.ctx.cfg["student"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.ctx.cfg["seed"] * 1000 + generation)
            fresh = create_model(s["arch"], num_classes=self.ctx.num_classes, in_chans=self.ctx.channels,
                                 image_size=self.ctx.image_size, where="student.kwargs", **s.get("kwargs", {}))
        return fresh.state_dict()

    def _freeze_copy(self, state: dict) -> nn.Module:
        """A frozen copy of the student's network holding `state` (made without drawing random numbers)."""
        net = copy.deepcopy(unwrap_model(self.student))
        net.load_state_dict(state)
        for p in net.parameters():
            p.grad = None
        return freeze(net)

    def start_generation(self) -> None:
        """Freeze the current student as the next teacher, re-initialise the student, reset its optimizer."""
        inner = unwrap_model(self.student)
        self.frozen.append(self._freeze_copy(inner.state_dict()))
        inner.load_state_dict(self._fresh_student_state(len(self.frozen)))
        opt = getattr(self.student_opt, "optimizer", self.student_opt)
        opt.state.clear()

    def lr_lambda(self, player: str, schedule: Callable[[int, int], float]) -> Callable[[int], float]:
        """With `restart_schedule`, the run's schedule restarted over each generation's own steps."""
        if player != "student" or not self.opts["restart_schedule"]:
            return super().lr_lambda(player, schedule)
        starts = [0, *self.boundaries(), self.ctx.steps]

        def factor(step: int) -> float:
            g = self.generation_of(step)
            return schedule(step - starts[g], starts[g + 1] - starts[g])
        return factor

    def step(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        o = self.opts
        while len(self.frozen) < self.generation_of(step):
            self.start_generation()
        x, y = self.inputs(batch)
        with torch.no_grad():
            t_logits = self.current_teacher()(x)
        s_logits = self.student(x)
        loss = hinton_kd(s_logits, t_logits, y, temperature=o["temperature"], alpha=o["alpha"])
        self.update(loss, self.student_opt)
        return {"loss": loss.detach(), "generation": torch.tensor(float(len(self.frozen) + 1), device=loss.device),
                "gen_lr": torch.tensor(float(self.student_opt.param_groups[0]["lr"]), device=loss.device)}

    def generations(self) -> dict[str, nn.Module]:
        """Every generation's network, oldest first: the frozen ones and the one training now."""
        nets = {f"gen{i + 1}": net for i, net in enumerate(self.frozen)}
        nets[f"gen{len(self.frozen) + 1}"] = self.student
        return nets

    def results(self) -> dict:
        """Test top-1 of every generation and of their softmax-averaged ensemble."""
        scores = test_top1(self.ctx, self.generations())
        return {f"{k}_top1" if k.startswith("gen") else k: v for k, v in scores.items()}

    def state_dict(self) -> dict:
        """The frozen generations' weights (the current student is a player, checkpointed by the engine)."""
        return {"frozen": [{k: v.detach().cpu() for k, v in net.state_dict().items()} for net in self.frozen]}

    def load_state_dict(self, state: dict) -> None:
        """Rebuild the frozen generations from `state_dict`'s weights."""
        self.frozen = [self._freeze_copy(s) for s in state["frozen"]]
