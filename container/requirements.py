"""Print the requirements of cnnpipe's core and the extras named in argv[1] ("all", "serve,mlflow", ...),
read from pyproject.toml: the image's dependency layer installs exactly these (pinned by constraints.txt)."""

import re
import sys
import tomllib

with open(sys.argv[2] if len(sys.argv) > 2 else "pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
extras, todo, deps = set(), [e for e in sys.argv[1].split(",") if e], list(project["dependencies"])
while todo:  # `all` names the others as cnnpipe[...]
    extra = todo.pop()
    if extra in extras:
        continue
    extras.add(extra)
    for dep in project["optional-dependencies"][extra]:
        own = re.fullmatch(r"cnnpipe\[(.*)\]", dep)
        if own:
            todo += own.group(1).split(",")
        else:
            deps.append(dep)
print("\n".join(deps))
