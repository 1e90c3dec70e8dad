import torch

# The probe's tensors are small: one thread avoids oversubscribing two shared cores.
torch.set_num_threads(1)

if __import__("os").environ.get("FESMIA_SLOW_WRITER"):
    # A slow disk: every background write waits, so a test that reads a history before the
    # monitor flushed fails every time instead of now and then.
    import time

    from fesmia_hooks import writer as _writer

    _run = _writer._run

    class _SlowQueue:
        def __init__(self, jobs):
            self._jobs = jobs

        def get(self):
            item = self._jobs.get()
            time.sleep(0.05)
            return item

        def task_done(self):
            self._jobs.task_done()

    _writer._run = lambda jobs, failed: _run(_SlowQueue(jobs), failed)
