"""kdjax's distillation API in one namespace.

`distill(config, workdir)` runs what `kdjax distill` runs: the teacher (fine-tuned once when
needed), the student, every stage and the evaluation and export. The pieces are here for a
training loop of one's own (see the README's Python example): students and layer maps, the frozen
teachers and their forward pass, a stage's loss (`loss_spec(ce=0.5, soft=0.5, temperature=2.0)`)
and the jitted student step.

Where things live: `kdjax.engine` (students, teachers, the combined loss, the step, the staged
run) and `kdjax.methods` (one module per method, each a `kdjax.engine.method.Method`).
"""

from kdjax.engine.loss import LossSpec, combined_loss, schedule_factor, temperature_at
from kdjax.engine.method import DistillError, Method, Needs, TermInputs
from kdjax.engine.run import (build_stage, compare_on_dev, inference_speed, stage_loss,
                              start_task)
from kdjax.engine.step import (distill_step, make_distill_step, student_forward,
                               student_step_metrics)
from kdjax.engine.students import (DistillStudent, build_student, first_layers,
                                   init_from_teacher, layer_map, non_embedding_params,
                                   spread_layers, student_config)
from kdjax.engine.teachers import Teachers, prepare_teachers, teacher_forward
from kdjax.methods import distill, loss_methods, loss_spec

__all__ = [
    "DistillError", "DistillStudent", "LossSpec", "Method", "Needs", "TermInputs", "Teachers",
    "build_stage", "build_student", "combined_loss", "compare_on_dev", "distill", "distill_step",
    "first_layers", "inference_speed", "init_from_teacher", "layer_map", "loss_methods",
    "loss_spec", "make_distill_step", "non_embedding_params", "prepare_teachers",
    "schedule_factor", "spread_layers", "stage_loss", "start_task", "student_config",
    "student_forward", "student_step_metrics", "teacher_forward", "temperature_at",
]
