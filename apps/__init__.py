"""The applications: ``licagent`` (the device's CLI and daemon), ``licadmin`` (the site's
administration tool) and the licensing-server client they use. They sit above the device
core (``agent``) and the links (``hw``) and below the simulators."""
