"""CUDA events for overlapping communication with computation, as DeepEP's EventOverlap."""
from typing import Optional, Sequence

import torch


class EventOverlap:
    """An event recorded after a library call on the Buffer's communication stream.

    `current_stream_wait()` makes the calling stream wait for it. `extra_tensors` are kept alive
    until this object is dropped (the inputs and outputs of an async_finish call). Used as a
    context manager, the block runs overlapped and the current stream waits at its end.
    """

    def __init__(self, event: Optional[torch.cuda.Event] = None,
                 extra_tensors: Optional[Sequence[torch.Tensor]] = None):
        self.event = event
        self.extra_tensors = tuple(extra_tensors) if extra_tensors else None

    def current_stream_wait(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.current_stream_wait()


def capture() -> EventOverlap:
    """An event recorded now on the current stream (pass it as `previous_event`)."""
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream())
    return EventOverlap(event)
