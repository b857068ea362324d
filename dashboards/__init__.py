"""What people look at: the Streamlit runs dashboard (:mod:`.app` over :mod:`.data`, which reads
through :mod:`storage` only) and the renderers of tables and overlays (:mod:`.render`), shared
with the reports and the command line."""
