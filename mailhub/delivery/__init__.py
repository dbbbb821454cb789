"""Final delivery: routing recipients, local Maildirs, privileged delivery processes, aliases."""
