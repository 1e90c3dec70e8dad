import torch

# The probe's tensors are small: one thread avoids oversubscribing two shared cores.
torch.set_num_threads(1)

if __import__("os").environ.get("FESMIA_SLOW_WRITER"):
    # A slow disk: every background write waits, so a test that reads a history before the
    # monitor flushed fails every time instead of now and then.
    import time

    from fesmia_hooks import writer as _writer

    _run = _writer.BackgroundWriter._run

    def _slow_run(self):
        get = self._queue.get

        def slow_get():
            item = get()
            time.sleep(0.05)
            return item

        self._queue.get = slow_get
        _run(self)

    _writer.BackgroundWriter._run = _slow_run
