"""`--target marlin`: the IST-DASLab Marlin checkpoint (writer.py, reader.py, facts.py)."""
