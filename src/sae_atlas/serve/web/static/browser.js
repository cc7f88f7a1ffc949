// Keyboard navigation for result tables: ↓/j and ↑/k move between rows, Enter opens the row's feature.
document.addEventListener("keydown", (event) => {
  const link = document.activeElement;
  if (!link || !link.classList.contains("row-link")) return;
  const links = Array.from(link.closest("table").querySelectorAll("a.row-link"));
  const index = links.indexOf(link);
  const step = { ArrowDown: 1, j: 1, ArrowUp: -1, k: -1 }[event.key];
  if (step === undefined) return;
  const next = links[index + step];
  if (next) {
    next.focus();
    event.preventDefault();
  }
});
