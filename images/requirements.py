"""Print kubedistill's requirements (and those of the given extras) from pyproject.toml, one a line.

    python3 images/requirements.py pyproject.toml                    # the operator's
    python3 images/requirements.py pyproject.toml worker serve-cpu   # the CPU worker's

The Dockerfiles install these first, in a layer that only pyproject.toml invalidates, and the
package itself afterwards without dependencies: a code change rebuilds in seconds instead of
downloading torch again. Standard library only (it runs before anything is installed).
"""

import sys
import tomllib


def main(pyproject: str, *extras: str) -> None:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    optional = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        sys.exit(f"requirements.py: no extra {unknown} in {pyproject} (known: {sorted(optional)})")
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += optional[extra]
    print("\n".join(requirements))


if __name__ == "__main__":
    main(*sys.argv[1:])
