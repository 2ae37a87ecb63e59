class KBError(ValueError):
    """A knowledge base is missing, corrupt, or does not fit the request.

    The message says what is wrong and how to fix it; nodes show it as is."""
