"""The interfaces that serve the query layer over HTTP: the page declarations, the JSON API and the
HTML browser built from them, and the guard every response passes."""
