"""In place: the ``nav.Module`` proxy, the registry of live modules, the handler that routes calls to the
selected runner, and binding a workspace's selection into live modules."""
