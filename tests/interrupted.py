"""A TrainingLoop that checkpoints every 2 steps and is interrupted at step 2 of its first, checkpointed run: the
resume tests patch it into a method's module and check the resumed edit equals an uninterrupted one."""

from erasers.train import TrainingLoop


class StopsAtTwo(TrainingLoop):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "checkpoint_every": 2})

    def run(self, step_fn):
        def stopping(step, generator):
            if step == 2 and self.start == 0 and self.path is not None:  # the checkpointed run only
                raise KeyboardInterrupt
            return step_fn(step, generator)
        return super().run(stopping)
