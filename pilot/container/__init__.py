"""Running a job's processes in containers: the runtimes and who uses which."""
