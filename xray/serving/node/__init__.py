"""The DICOM node (``python3 run.py node``): a Storage SCP whose received studies are analysed once stable and whose
results go back by C-STORE or STOW-RS. The spool and its records (``spool``), what is kept and analysed (``rules``),
the SCP (``scp``), the results and their transports (``results``), urgency (``triage``), the node itself
(``service``). Part of ``serving/``: it uses the stages before it, as the rest of serving does."""
