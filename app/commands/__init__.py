"""The ``bitplan`` commands, one small module per group; :mod:`bitplan.app.cli` assembles them.

- :mod:`~bitplan.app.commands.formats`: ``formats``;
- :mod:`~bitplan.app.commands.planning`: ``analyze``, ``search``, ``solve``;
- :mod:`~bitplan.app.commands.apply`: ``apply``;
- :mod:`~bitplan.app.commands.server`: ``db upgrade``, ``keys create``, ``serve``, ``worker``;
- :mod:`~bitplan.app.commands.jobs`: ``submit``, ``status``, ``wait``, ``cancel``, ``download``;
- :mod:`~bitplan.app.commands.demo`: ``demo``.

Every module here imports only typer, rich and light bitplan modules at the top; the library,
the database, the web server and the HTTP client load inside the commands that use them.
"""
