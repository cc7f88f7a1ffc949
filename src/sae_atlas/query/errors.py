"""What a query can be refused for: a feature nobody knows (404), a parameter naming something
the output does not have (422). Each message is one line naming the value."""


class FeatureNotFound(KeyError):
    """No output file knows this feature id."""


class QueryError(ValueError):
    """A query names an unknown metric, column or explainer; the message says which."""
