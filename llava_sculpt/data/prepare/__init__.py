"""Converters from each benchmark's official raw files to LLaVA training JSON and evaluation question
JSON lines (`llava-sculpt prepare`, see cli.py for the output formats), and synthetic raw fixtures."""
