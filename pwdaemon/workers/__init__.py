"""Compile worker processes, what they run, and the frames they speak over their pipes."""
