"""Why the engine refuses a request. Plain exceptions the doors map to statuses."""


class QueueFullError(RuntimeError):
    """The waiting queue is at ``max_num_waiting``; the request was not admitted."""


class DuplicateRequestError(ValueError):
    """Another request in flight already has this id."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down and takes no new requests."""


class ConstraintError(ValueError):
    """A request's constraint (schema, regex, choice, grammar) cannot be compiled: the message says why."""
