"""``licagent``: the device's command-line tool and its daemon (``licagent run``)."""
