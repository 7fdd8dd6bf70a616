"""Files written and read safely, under everything else: writes (whole-or-nothing writes, folder
checks, one-line write errors), lock (one writer per folder) and safe_pickle (pickles that cannot
run code). Imports nothing of the project.
"""
