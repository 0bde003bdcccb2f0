"""adaptkit's built-in plugins (installed as ``adaptkit_plugins``).

They are registered exactly like third-party plugins: registry.yaml lists these
modules, and each one exposes ``@hookimpl`` functions returning typed records.
Modules here import only pydantic at the top; torch and model libraries are imported
by the factories, inside the ``_impl`` modules.
"""
