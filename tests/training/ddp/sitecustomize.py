"""Loaded by every Python process started with this folder on PYTHONPATH: makes rank LITE_FT_FAIL_RANK fail at
its second training micro-batch with a data error, to test that one failing rank stops the whole job."""
import os

if os.environ.get("RANK") == os.environ.get("LITE_FT_FAIL_RANK"):
    from lite_ft.training import loss

    real = loss.LossGuard.__call__
    calls = []

    def failing(self, model, batch):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("injected: a broken example on this rank")
        return real(self, model, batch)

    loss.LossGuard.__call__ = failing
