"""Training flows: ``distill`` (paper Table 4) and ``finetune-voc`` (the VOC2007 classifier).

``distill``: teacher -> the teacher's maps for each method in use (one task each) -> one student
task per configuration, each starting as soon as its method's maps exist -> Table 4 (table and
markdown artifacts) and ``report.html`` with learning curves. Tasks checkpoint every epoch;
re-running with the same run id resumes every configuration from its last epoch and skips
finished ones. With CUDA each task asks for one ``GPU`` resource.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from tqdm import tqdm

from dashboards import render
from shapcam.training.distillation import parse_variants
from tasks.config import DistillSpec, FinetuneSpec, device_resources
from tasks.training import (
    distill_table,
    finetune_voc_task,
    student_task,
    table_rows,
    teacher_maps_task,
    teacher_task,
    write_training_report,
)

from .runtime import artifact_key, require_resources, resource_annotation

teacher_t = task(teacher_task, name="teacher", retries=1, persist_result=False)
maps_t = task(teacher_maps_task, name="teacher_maps", retries=1, persist_result=False)
student_t = task(student_task, name="student", retries=1, persist_result=False)
finetune_t = task(finetune_voc_task, name="finetune", retries=1, persist_result=False)


def _wait(futures: list, students: dict[int, str], run_id: str, progress: Any
          ) -> dict[str, str]:
    """Wait for every task; a failed student is recorded (the others finish), a failed
    teacher or teacher-maps task stops the flow. Returns configuration -> why it failed."""
    failed: dict[str, str] = {}
    with tqdm(total=len(futures), desc=f"distill {run_id}", unit="task") as bar:
        for done, fut in enumerate(as_completed(futures), start=1):
            try:
                summary = fut.result()
            except Exception as exc:  # a diverged student: record it, finish the others
                if id(fut) not in students:
                    raise  # the teacher or its maps: nothing can go on without them
                failed[students[id(fut)]] = f"{type(exc).__name__}: {exc}"
                summary = {"config": students[id(fut)]}
            bar.set_postfix_str(str(summary.get("config") or summary.get("method")))
            bar.update()
            update_progress_artifact(progress, 100.0 * done / len(futures))
    return failed


@flow(name="distill", flow_run_name="distill {spec[dataset]} ({run_id})", log_prints=True)
def distill(run_dir: str, run_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Train the teacher, its maps, and one student per configuration into ``run_dir``.
    ``spec``: a :class:`tasks.config.DistillSpec` as a dict."""
    s = DistillSpec.from_dict(spec)
    variants = parse_variants(s.variants)
    methods = sorted({v.method for v in variants if v.method})
    total = 1 + len(methods) + len(variants)
    progress = create_progress_artifact(0.0, key=artifact_key("progress", run_id),
                                        description=f"training tasks done of {total}")
    require_resources(device_resources(s.device), 60)
    with resource_annotation(device_resources(s.device)):
        teacher = teacher_t.with_options(task_run_name=f"teacher {s.teacher}").submit(
            run_dir, run_id, s)
        maps = {m: maps_t.with_options(task_run_name=f"teacher maps {m}").submit(
            run_dir, run_id, s, m, wait_for=[teacher]) for m in methods}
        students = {v.name: student_t.with_options(task_run_name=f"student {v.name}").submit(
            run_dir, run_id, s, v.name, wait_for=[maps[v.method] if v.method else teacher])
            for v in variants}
    failed = _wait([teacher, *maps.values(), *students.values()],
                   {id(f): name for name, f in students.items()}, run_id, progress)
    title = f"{s.dataset}: {s.student} from {s.teacher}, final-epoch test error %"
    table = distill_table(run_dir, title, failed)
    markdown = render.markdown(table, heading="### ")
    create_table_artifact(key=artifact_key("table4", run_id), table=table_rows(table),
                          description=title)
    report = write_training_report(run_dir, table, s.to_dict())
    create_markdown_artifact(key=artifact_key("distill", run_id),
                             markdown=markdown + f"\n\nReport: {render.code_span(report)}",
                             description="Table 4 (knowledge distillation)")
    print(markdown)
    return {"run_dir": run_dir, "table": table_rows(table), "markdown": markdown,
            "report": str(report), "failed": failed}


@flow(name="finetune-voc", flow_run_name="finetune {spec[model]} on VOC ({run_id})",
      log_prints=True)
def finetune_voc(run_dir: str, run_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune an ImageNet model on VOC2007 (multi-label) and save weights for `shapcam run
    --dataset voc --models NAME:WEIGHTS`. ``spec``: a :class:`tasks.config.FinetuneSpec`."""
    s = FinetuneSpec.from_dict(spec)
    require_resources(device_resources(s.device), 60)
    with resource_annotation(device_resources(s.device)):
        result = finetune_t.with_options(task_run_name=f"finetune {s.model}").submit(
            run_dir, run_id, s).result()
    table = render.Table(f"{s.model} fine-tuned on VOC2007 {s.train_split}",
                         ["metric", "value"],
                         [[f"mAP on {s.test_split} (%)", result["test_map"]],
                          ["epochs", str(result["epochs"])]],
                         [f"Weights: {render.code_span(result['weights'])}"], digits=2)
    markdown = render.markdown(table, heading="### ")
    report = write_training_report(run_dir, table, s.to_dict(), metric="test_map")
    create_markdown_artifact(key=artifact_key("finetune", run_id), markdown=markdown,
                             description="VOC2007 fine-tuning")
    print(markdown)
    return {**result, "report": str(report), "markdown": markdown}
