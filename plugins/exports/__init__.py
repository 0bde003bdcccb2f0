"""Built-in export formats of ``adaptkit export`` (each registered through ``adaptkit_export_formats``)."""
