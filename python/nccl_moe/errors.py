"""The exception every failed library call raises."""
from ._structs import RESULT_NAMES


class NcclMoeError(RuntimeError):
    """A call returned an ncclResult_t other than ncclSuccess.

    Attributes: `code` (the ncclResult_t value, int), `code_name` ("ncclInvalidArgument", ...),
    `function` (the C function called), `message` (ncclMoeGetLastError()'s text at the time).
    """

    def __init__(self, function: str, code: int, message: str):
        self.function = function
        self.code = code
        self.code_name = RESULT_NAMES.get(code, f"ncclResult {code}")
        self.message = message
        super().__init__(f"{function} failed: {self.code_name} ({code}): {message}")
