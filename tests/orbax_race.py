"""The race that follows a failed orbax read or write, made certain (for tests of what a job prints).

orbax runs the parts of a read or write as an asyncio gather on an event loop of its own
(orbax.checkpoint._src.asyncio_utils.run_sync) and closes the loop at the first failure. Whether other
parts are still running then is a matter of timing; when they are, one that fails later has its exception
never retrieved (asyncio logs it with a traceback when the task is collected), and a tensorstore read that
completes after the close calls back into the closed loop ('Event loop is closed', an unraisable exception).
`abandon_orbax_work()` makes both happen, through orbax's run_sync and a tensorstore future."""

import asyncio
import gc


def abandon_orbax_work() -> None:
    import tensorstore as ts
    from orbax.checkpoint._src import asyncio_utils

    promise, read = ts.Promise.new()

    async def fails():
        raise ValueError("a damaged array file")

    async def fails_later():
        await asyncio.sleep(0)
        raise ValueError("another damaged array file")

    async def restore():
        asyncio.ensure_future(fails_later())
        await asyncio.gather(fails(), read)

    try:
        asyncio_utils.run_sync(restore())
    except ValueError as e:
        assert str(e) == "a damaged array file", e
    else:
        raise AssertionError("the first part did not fail")
    promise.set_result(1)  # the read completes after the loop closed
    gc.collect()  # collects the task whose exception nobody retrieved
